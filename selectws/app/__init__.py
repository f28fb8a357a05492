"""Application: the command line, the workers supervisor, socket activation and the CLI client. It loads the
configuration, picks the plugins and the broker, and hands them to the server."""
