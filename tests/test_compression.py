"""8-bit pushes with error feedback and delta pulls: the codecs' arithmetic, their frames, and the
server's copy of each worker's parameters, equal bit for bit to what the worker rebuilt."""
import crc32c
import pytest
import torch

from gapaware import WorkerClient
from gapaware.common import codecs, transport
from gapaware.common.codecs import BLOCK, FLOAT8, INT8, ErrorFeedback, add_quantized_, dequantize, quantize, \
    quantize_delta_
from gapaware.common.transport import Assembler, ChunkView, TransportError, encode, frame_parser
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.server.policies import make_policy
from gapaware.simulator.master import LocalMaster
from gapaware.worker.compression import PulledParameters, PushEncoder
from tests.inprocess import small_state

WIRE = {INT8: pb.INT8, FLOAT8: pb.FLOAT8_E4M3FN}


def randn(numel: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale


# -- the codecs ------------------------------------------------------------------------------

def test_int8_scales_each_block_by_its_largest_magnitude_and_rounds_to_nearest():
    block = torch.zeros(BLOCK)
    block[:4] = torch.tensor([1.0, -2.0, 0.5, 0.25])
    quantized = quantize(torch.cat([block, torch.full((3,), 4.0)]), INT8)
    assert quantized.scales.tolist() == pytest.approx([2.0 / 127, 4.0 / 127], rel=1e-7)
    # 1 → 63.5 → 64 (ties to even), −2 → −127, 0.5 → 31.75 → 32, 0.25 → 15.875 → 16; the short block: 127
    assert quantized.values[:4].tolist() == [64, -127, 32, 16] and quantized.values[BLOCK:].tolist() == [127] * 3
    assert dequantize(quantized)[:2].tolist() == [64 * quantized.scales[0].item(), -2.0]
    assert INT8.nbytes(BLOCK + 3) == BLOCK + 3 + 8


@pytest.mark.parametrize("codec, bound", [(INT8, "absolute"), (FLOAT8, "relative")])
def test_rounding_error_is_within_half_a_step(codec, bound):
    x = randn(5 * BLOCK + 17) * torch.linspace(0.01, 10, 5 * BLOCK + 17)
    quantized = quantize(x, codec)
    error = (dequantize(quantized) - x).abs()
    scale = quantized.scales.repeat_interleave(BLOCK)[:x.numel()]
    if bound == "absolute":  # int8: half a step of the block's scale
        assert bool((error <= scale * 0.5 * (1 + 1e-6)).all())
    else:  # float8 e4m3: 3 mantissa bits, half an ulp (2⁻⁴ relative) above its smallest normal, 2⁻¹⁰·scale below
        normal = (x.abs() / scale) >= 2.0 ** -6
        assert bool((error[normal] <= x.abs()[normal] * 2.0 ** -4 * (1 + 1e-6)).all())
        assert bool((error[~normal] <= scale[~normal] * 2.0 ** -10 * (1 + 1e-6)).all())


@pytest.mark.parametrize("codec", [INT8, FLOAT8])
def test_a_block_with_nan_or_inf_decodes_to_nan_and_the_others_stay_exact(codec):
    x = randn(3 * BLOCK)
    x[5], x[BLOCK + 9] = float("nan"), float("inf")
    decoded = dequantize(quantize(x, codec))
    assert bool(decoded[:2 * BLOCK].isnan().all())
    assert torch.equal(decoded[2 * BLOCK:], dequantize(quantize(x[2 * BLOCK:], codec)))


def test_a_zero_block_is_zero():
    quantized = quantize(torch.zeros(BLOCK + 1), INT8)
    assert quantized.scales.tolist() == [0.0, 0.0] and torch.equal(dequantize(quantized), torch.zeros(BLOCK + 1))


@pytest.mark.parametrize("codec", [INT8, FLOAT8])
def test_error_feedback_sends_the_sum_of_the_gradients_less_the_residual(codec):
    """Σ decode(Q(g_t + e_t)) = Σ g_t − e_T: nothing rounding drops is lost, only delayed; and each
    residual is at most one rounding of its push."""
    numel = 3 * BLOCK + 5
    feedback = ErrorFeedback(codec, numel)
    sent, total = torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.float64)
    for step in range(30):
        grad = randn(numel, step, scale=1e-3) * torch.linspace(0.1, 3, numel)
        quantized = feedback.quantize(grad)
        sent += dequantize(quantized).double()
        total += grad.double()
        scale = quantized.scales.repeat_interleave(BLOCK)[:numel]
        limit = 0.5 * scale if codec is INT8 else scale * 448 * 2.0 ** -4
        assert bool((feedback.residual.abs() <= limit * (1 + 1e-5)).all())
    # equal but for float32's rounding of g + e and p − decode(Q(p)): an ulp of 0.01 a push
    torch.testing.assert_close(sent + feedback.residual.double(), total, rtol=0, atol=30 * 2.0 ** -30)
    feedback.reset()
    assert not feedback.residual.any()


def test_a_nan_gradient_does_not_poison_the_next_pushes():
    feedback = ErrorFeedback(INT8, BLOCK)
    feedback.quantize(torch.full((BLOCK,), float("nan")))
    assert not feedback.residual.any()
    grad = randn(BLOCK)
    assert torch.equal(dequantize(feedback.quantize(grad)), dequantize(quantize(grad, INT8)))


@pytest.mark.parametrize("codec", [INT8, FLOAT8])
def test_delta_copies_follow_the_target_without_drift_and_receivers_agree_bit_for_bit(codec, monkeypatch):
    """The server's copy and a receiver that adds each delta (whole, or in other slices) end equal bit
    for bit; the copy stays within one rounding of the last difference of a target that moves."""
    monkeypatch.setattr(codecs, "SLICE_BLOCKS", 2)
    numel = 2 * codecs.SLICE_BLOCKS * BLOCK + 777  # three slices, the last one ending in a short block
    target = randn(numel, 0)
    copy, receiver, in_chunks = target.clone(), target.clone(), target.clone()
    for step in range(20):
        target += randn(numel, step + 1, scale=1e-3)
        difference = target - copy
        delta = quantize_delta_(target, copy, codec)
        add_quantized_(receiver, delta)
        header, frames = encode(delta, WIRE[codec], chunk_bytes=3 * 1028 + 5)
        assembler = Assembler(header, numel=numel, out=in_chunks, accumulate=True)
        for frame in frames:
            assembler.add(frame_parser(pb.PullFrame)(frame))
        assembler.finish()
        assert torch.equal(copy, receiver) and torch.equal(copy, in_chunks)
        scale = delta.scales.repeat_interleave(BLOCK)[:numel]
        limit = 0.5 * scale if codec is INT8 else difference.abs() * 2.0 ** -4 + scale * 2.0 ** -10
        rounded = target.abs() * 2.0 ** -23  # and half an ulp of the copy, where copy + delta is rounded
        assert bool(((target - copy).abs() <= limit * (1 + 1e-5) + rounded).all())


# -- the frames ----------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [INT8, FLOAT8])
@pytest.mark.parametrize("numel, chunk_bytes", [(1, 4096), (BLOCK, 1), (5 * BLOCK + 3, 2 * 1028), (300_000, 1 << 20)])
def test_quantized_tensors_travel_in_chunks_of_whole_blocks_with_their_scales(codec, numel, chunk_bytes):
    quantized = quantize(randn(numel), codec)
    header, frames = encode(quantized, WIRE[codec], chunk_bytes)
    chunks = [frame_parser(pb.PullFrame)(frame) for frame in frames]
    blocks_per_chunk = max(1, chunk_bytes // 1028)
    assert header.dtype == WIRE[codec] and header.numel == numel
    assert header.chunk_count == len(chunks) == -(-codec.blocks(numel) // blocks_per_chunk)
    assert sum(len(chunk.data) for chunk in chunks) == codec.nbytes(numel) == transport.wire_bytes(WIRE[codec], numel)
    first = chunks[0].data
    scales = min(blocks_per_chunk, codec.blocks(numel))
    assert bytes(first[:4 * scales]) == quantized.scales[:scales].numpy().tobytes(), "the chunk opens with its scales"
    assembler = Assembler(header, numel=numel)
    for chunk in chunks:
        assembler.add(chunk)
    assert torch.equal(assembler.finish(), dequantize(quantized))


def test_a_quantized_chunk_that_is_not_whole_blocks_or_corrupt_is_refused():
    quantized = quantize(randn(3 * BLOCK + 10), INT8)
    header, frames = encode(quantized, pb.INT8, chunk_bytes=1028)
    chunks = [frame_parser(pb.PullFrame)(frame) for frame in frames]

    def assemble(sequence):
        assembler = Assembler(header, numel=3 * BLOCK + 10)
        for chunk in sequence:
            assembler.add(chunk)
        return assembler.finish()

    short = bytes(chunks[0].data[:1000])
    with pytest.raises(TransportError, match="chunk 0 has 1000 bytes: not whole blocks of 1028 bytes"):
        assemble([ChunkView(0, memoryview(short), crc32c.crc32c(short))])
    scale_flipped = bytearray(chunks[1].data)
    scale_flipped[2] ^= 0x01
    with pytest.raises(TransportError, match="checksum mismatch in chunk 1"):
        assemble([chunks[0], ChunkView(1, memoryview(bytes(scale_flipped)), chunks[1].crc32c)])
    assert torch.equal(assemble(chunks), dequantize(quantized))
    with pytest.raises(TransportError, match="header announces 5 chunks for 3098 bytes"):
        Assembler(pb.TensorHeader(dtype=pb.INT8, numel=3 * BLOCK + 10, chunk_count=5), numel=3 * BLOCK + 10)
    with pytest.raises(TransportError, match="a delta must come in an 8-bit dtype"):
        Assembler(pb.TensorHeader(dtype=pb.FLOAT32, numel=4, chunk_count=1), numel=4, out=torch.zeros(4),
                  accumulate=True)
    with pytest.raises(ValueError, match="needs a Quantized tensor"):
        encode(torch.zeros(4), pb.INT8)


def test_a_retried_push_sends_the_same_bytes_and_feeds_back_once():
    def sent(encoder, grad, seq):
        return b"".join(encoder.encode(grad, seq)[1])

    encoder = PushEncoder(pb.INT8, chunk_bytes=1 << 20)
    grad = randn(2 * BLOCK, scale=1e-2)
    first = sent(encoder, grad, seq=1)
    assert sent(encoder, randn(2 * BLOCK, 9), seq=1) == first, "a retry sends what the first attempt sent"
    assert sent(encoder, grad, seq=2) != first, "a new push adds what the last one lost"
    encoder.reset()
    assert sent(encoder, grad, seq=3) == first, "after a reset (a new join) nothing earlier is fed back"

    cut_off, whole = PushEncoder(pb.INT8, chunk_bytes=1028), PushEncoder(pb.INT8, chunk_bytes=1028)
    next(cut_off.encode(grad, seq=1)[1])  # the first attempt sends one chunk of two, then fails
    assert sent(cut_off, grad, seq=1) == sent(whole, grad, seq=1), "a retry finishes what the first attempt began"
    assert sent(cut_off, grad, seq=2) == sent(whole, grad, seq=2)


def test_a_pull_not_received_whole_makes_the_next_one_full():
    pulled = PulledParameters(pb.INT8)
    theta = randn(2 * BLOCK)
    header, frames = encode(theta)
    held = pulled.receive(pb.PullHeader(tensor=header, delta_id=7), (frame_parser(pb.PullFrame)(f) for f in frames),
                          2 * BLOCK, None)
    assert torch.equal(held, theta) and pulled.base(held) == 7 and pulled.base(None) == 7
    assert pulled.base(torch.empty(2 * BLOCK)) == 0, "another tensor does not hold the base"
    delta = quantize(randn(2 * BLOCK, 1), INT8)
    header, frames = encode(delta, pb.INT8, chunk_bytes=1028)
    first_chunk = [frame_parser(pb.PullFrame)(next(frames))]
    with pytest.raises(TransportError, match="stream ended after 1 of 2 chunks \\(1028 of 2056 bytes\\)"):
        pulled.receive(pb.PullHeader(tensor=header, delta=True, delta_id=8), iter(first_chunk), 2 * BLOCK, held)
    assert pulled.base(held) == 0
    with pytest.raises(TransportError, match="a delta to parameters this worker does not hold"):
        pulled.receive(pb.PullHeader(tensor=header, delta=True, delta_id=9), iter(()), 2 * BLOCK, held)


# -- the server's copies -------------------------------------------------------------------

NUMEL = 5000


def delta_state(policy: str, full_pull_every: int = 100):
    import dataclasses
    state = small_state(NUMEL, policy=policy)
    state.config = dataclasses.replace(state.config, full_pull_every=full_pull_every)
    state.model.full_pull_every = full_pull_every
    return state


def test_pulls_are_full_at_join_after_a_base_it_does_not_hold_and_every_k_pulls():
    state = delta_state("asgd", full_pull_every=3)
    worker = state.join("h", "cpu", None).worker_id
    kinds, base = [], 0
    for step in range(7):
        version, sent = state.pull_to_send(worker, INT8, base)
        kinds.append("delta" if sent.delta else "full")
        assert sent.delta_id > base
        base = sent.delta_id
        state.push(state.admit(worker, randn(NUMEL, step, scale=0.01), base_version=version))
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta", "full"]
    _, stale = state.pull_to_send(worker, INT8, base - 1)
    assert not stale.delta and torch.equal(stale.tensor, state.theta), "a base that is not the server's copy " \
        "(the worker lost a reply) gets a full pull"
    again = state.join("h", "cpu", None).worker_id
    assert not state.pull_to_send(again, INT8, stale.delta_id)[1].delta, "a new worker id starts with a full pull"
    assert state.held_snapshots() == 2 and state.snapshot_bytes() == 2 * NUMEL * 4, "asgd keeps a copy for each"
    state.pull(again)
    state.leave(worker)
    assert state.held_snapshots() == 0, "a float32 pull ends the copy (asgd keeps no θ⁽ⁱ⁾), leaving frees it"


@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga", "asgd", "staleness-aware"])
def test_the_worker_rebuilds_the_servers_copy_bit_for_bit_and_the_gap_is_measured_against_it(
        inprocess_servers, policy):
    """An int8 worker and a float32 one push to one server; a reference policy applies what the server
    decodes, with θ⁽ⁱ⁾ = what the int8 worker rebuilt: the same θ and the same Gaps, and the worker's
    parameters equal the server's copy bit for bit after every pull, full (every 4th) or delta."""
    state = delta_state(policy, full_pull_every=4)
    server = inprocess_servers(state)
    reference = make_policy(policy, NUMEL, momentum=0.9)
    theta, feedback = state.theta.clone(), ErrorFeedback(INT8, NUMEL)
    with WorkerClient(server.address, push_dtype="int8", pull_dtype="int8", timeout=30) as client, \
            WorkerClient(server.address, timeout=30) as other:
        client.join()
        other.join()
        out = torch.empty(NUMEL)
        version, pulled = client.pull(out=out)
        other_version, other_pulled = other.pull()
        gaps = []
        for step in range(9):
            assert pulled is out and torch.equal(pulled, state.model.take_snapshot(client.info.worker_id)[0])
            if step % 3 == 1:  # the float32 worker pushes in between: the int8 worker's push is stale
                grad = randn(NUMEL, 100 + step, scale=0.1)
                reference.apply(theta, grad, lr=state.lr(), staleness=state.version - other_version,
                                stale_theta=other_pulled.clone(), worker_id=other.info.worker_id)
                _, other_version, other_pulled = other.push_pull(grad, other_version)
            grad = randn(NUMEL, step, scale=0.1)
            expected = reference.apply(theta, dequantize(feedback.quantize(grad)), lr=state.lr(),
                                       staleness=state.version - version, stale_theta=pulled.clone(),
                                       worker_id=client.info.worker_id)
            result, version, pulled = client.push_pull(grad, version, out=out)
            assert result.mean_gap == pytest.approx(expected, rel=1e-9)
            assert torch.equal(state.theta, theta)
            gaps.append(result.mean_gap)
        if policy == "gap-aware":
            assert gaps[0] == 1.0, "a fresh push on a full pull"
            assert gaps[2] > 1.0, "θ⁽ⁱ⁾ is the worker's rounded copy, not θ: a fresh push on a delta's Gap exceeds 1"
        version, pulled = client.pull(out=torch.empty(NUMEL))
        assert torch.equal(pulled, state.model.take_snapshot(client.info.worker_id)[0]), \
            "a pull into another tensor is a full one"


def test_the_simulator_rebuilds_what_the_server_keeps():
    state = delta_state("gap-aware")
    master = LocalMaster(state, 3, push_dtype="int8", pull_dtype="float8")
    for step in range(6):
        worker = step % 3
        version, theta = master.pull(worker)
        assert torch.equal(theta, state.model.take_snapshot(state.live_workers()[worker].worker_id)[0])
        master.push(worker, randn(NUMEL, step, scale=0.1), base_version=version)
