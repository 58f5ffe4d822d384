"""Questions for `tlq eval`: the calibration JSONL format, the last assistant turn is the reference."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tlq.data.calib import CalibSample, load_calibration


@dataclass(frozen=True)
class QAItem:
    """One question.

    Attributes:
        sample: the validated JSONL line (its messages end with the reference answer).
        reference: the reference answer's text.
        question_type: the line's "question_type", None when absent.
    """

    sample: CalibSample
    reference: str
    question_type: str | None

    @property
    def id(self) -> str:
        return self.sample.id

    @property
    def prompt_messages(self) -> list:
        return self.sample.messages[:-1]

    def openai_messages(self, with_answer: bool = False) -> list[dict]:
        """Chat messages for the OpenAI API: {"type": "image"} parts become base64 image_url parts."""
        from serve.client import file_data_url

        images = iter(self.sample.image_paths)
        out = []
        for msg in self.sample.messages if with_answer else self.prompt_messages:
            content = msg["content"]
            if isinstance(content, list):
                content = [{"type": "image_url", "image_url": {"url": file_data_url(next(images))}}
                           if part.get("type") == "image" else {"type": "text", "text": part["text"]}
                           for part in content]
            out.append({"role": msg["role"], "content": content})
        return out


def load_questions(path: Path | None, max_samples: int | None = None) -> list[QAItem]:
    """Validated questions from `path` (the bundled set when None)."""
    from tlq.data.calib import bundled_calibration_path
    samples = load_calibration(path or bundled_calibration_path(), max_samples=max_samples)
    return [QAItem(s, s.answer, s.question_type) for s in samples]
