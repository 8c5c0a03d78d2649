"""The live Streamlit panel: ``app`` (pages) over ``data`` (what each page reads from Redis)."""

__all__: list[str] = []
