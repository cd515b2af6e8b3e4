"""ecgray: few-shot ECG question answering with a meta-learned ECG-language model, on Ray.

`import ecgray` pulls in neither Ray nor DeepSpeed: frameworks are imported lazily at the edges
(`ecgray.train`, `jobs/`, `serve/`). `ecgray.models` and `ecgray.meta` need only torch (+ transformers).
"""

__version__ = "0.1.0"

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
"""The canonical 12-lead order every signal is reordered to, by name."""
