"""The checked-in generated modules are what grpcio-tools makes of the .proto today."""
from gapaware.proto import generate


def test_generated_code_is_up_to_date(tmp_path):
    for fresh in generate.generate(tmp_path):
        checked_in = generate.PROTO_DIR / fresh.name
        assert checked_in.read_text() == fresh.read_text(), (
            f"{checked_in.name} is out of date with {generate.PROTO_FILE}: run `make proto`"
        )
