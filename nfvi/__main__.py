from nfvi.cli import main

main()
