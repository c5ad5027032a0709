"""`--server URL`: the commands' work sent to a running `bilingual-qa serve` (client.py: HTTP and
errors; stages.py: server-backed stand-ins the batch jobs run with; commands.py: what each command
prints). A room beside serve/: it imports jobs and text, never qa, llm or mt, so never torch."""
