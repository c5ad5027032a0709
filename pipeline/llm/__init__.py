"""Stage 3, the answer: `Answerer` (prompt, stops, streaming) and the phi-2 generation engines."""
