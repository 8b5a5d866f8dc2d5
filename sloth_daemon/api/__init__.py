"""Front ends: the OpenAI-compatible HTTP API (`http`), its request schemas (`schemas`) and error bodies (`errors`);
the ZeroMQ API (`zmq`) and its wire protocol (`zmq_protocol`, shared with `sloth_daemon.client`). Both serve the
operations in `sloth_daemon.operations`."""
