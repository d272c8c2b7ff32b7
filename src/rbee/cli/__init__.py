"""`rbee`: the command line. Each command parses its flags, calls the queen client, renders."""
