from sharded.cli import main

main()
