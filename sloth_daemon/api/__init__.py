"""Front ends: the OpenAI-compatible HTTP API (`http`), its request schemas (`schemas`) and error bodies (`errors`)."""
