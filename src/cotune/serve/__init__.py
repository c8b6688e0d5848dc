"""cotune serve: an OpenAI-compatible server for many LoRA adapters on one base, batching across them
(``app`` the HTTP API, ``engine`` the scheduler, ``batch`` the shared cache; see the README's Serving)."""
