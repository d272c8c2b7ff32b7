"""queen-rbee: the cluster's brain — registry, scheduling, routing, the OpenAI API."""
