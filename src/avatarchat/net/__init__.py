"""Network plumbing shared by the gateway and the LLM router (the HTTP/1.1 transport under their httpx clients)."""
