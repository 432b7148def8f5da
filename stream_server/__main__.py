from stream_server.cli import main

main()
