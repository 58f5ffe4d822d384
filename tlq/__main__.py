from tlq.cli import main

main()
