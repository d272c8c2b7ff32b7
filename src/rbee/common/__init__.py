"""Small pieces every daemon uses: auth, errors, clock, serving. Imports only contracts."""
