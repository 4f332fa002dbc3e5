"""Federation: payloads, the grid that carries them, the local engine, aggregation, sampling."""
