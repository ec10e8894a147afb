"""Model-card templates (Jinja + Markdown with YAML front matter), rendered by ``hf_effllm.hub``."""
