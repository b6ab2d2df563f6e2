from gapaware.cli import main

main()
