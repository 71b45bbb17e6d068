"""One browser session's chat state (`ChatSession`): its turns, the model's messages + image codes derived from
them, and the chatbot's display."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mllm.sequence import IMAGE_PLACEHOLDER
from mllm.serve.limits import ServeLimits, UserInputError


@dataclass
class ChatReplyRecord:
    """An assistant turn: `content` with `<image>` where images were drawn, their (pixel, semantic) codes, and
    the display segments in order: ("text", str) or ("image", PNG path)."""

    content: str
    codes: list[tuple[Any, Any]]
    segments: list[tuple[str, str]]


@dataclass
class ChatTurn:
    text: str
    image_paths: list[str]
    image_codes: list[tuple[Any, Any]]
    reply: ChatReplyRecord | None = None
    attempt: int = 0  # how often the reply was regenerated (shifts the seed)


@dataclass
class ChatSession:
    """One browser session's conversation. Kept in a `gr.State`, so every session has its own."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    turns: list[ChatTurn] = field(default_factory=list)

    def check_room(self, limits: ServeLimits) -> None:
        """Drop a turn left without reply (a failed or abandoned request); refuse a turn past `max_turns`."""
        self.drop_pending()
        if len(self.turns) >= limits.max_turns:
            raise UserInputError(
                f"This conversation has reached {limits.max_turns} turns; press Clear to start a new one"
            )

    def add_user_turn(self, turn: ChatTurn, limits: ServeLimits) -> None:
        self.check_room(limits)
        self.turns.append(turn)

    def pending(self) -> ChatTurn | None:
        """The last turn when it still waits for its reply."""
        return self.turns[-1] if self.turns and self.turns[-1].reply is None else None

    def drop_pending(self) -> None:
        if self.pending() is not None:
            self.turns.pop()

    def rewind_reply(self) -> Callable[[], None]:
        """Make the last turn pending again (regenerate: the seed shifts by 1000); returns the undo."""
        if not self.turns:
            raise UserInputError("Nothing to regenerate yet")
        turn = self.turns[-1]
        previous = turn.reply
        turn.reply = None
        turn.attempt += 1

        def restore() -> None:
            turn.reply = previous
            turn.attempt -= 1

        return restore

    def conversation(self) -> tuple[list[dict], list[tuple[Any, Any]]]:
        """The model's messages (with `<image>` placeholders) and the image codes in placeholder order."""
        messages: list[dict] = []
        codes: list[tuple[Any, Any]] = []
        for turn in self.turns:
            content = f"{IMAGE_PLACEHOLDER}\n" * len(turn.image_codes) + turn.text
            messages.append({"role": "user", "content": content})
            codes += turn.image_codes
            if turn.reply is not None:
                messages.append({"role": "assistant", "content": turn.reply.content})
                codes += turn.reply.codes
        return messages, codes

    def seed_offset(self) -> int:
        """Seed shift of the pending reply: one per turn, 1000 per regeneration."""
        return len(self.turns) - 1 + 1000 * (self.turns[-1].attempt if self.turns else 0)

    def chatbot_messages(self, streaming: str | None = None) -> list[dict]:
        """The Chatbot value: user images then text; assistant text and drawn images interleaved; a pending
        turn shows `streaming` (the reply so far) when given."""
        shown: list[dict] = []
        for index, turn in enumerate(self.turns):
            user: list[Any] = [{"path": p, "alt_text": "uploaded image"} for p in turn.image_paths]
            if turn.text:
                user.append(turn.text)
            shown.append({"role": "user", "content": user})
            if turn.reply is not None:
                parts = [
                    text if kind == "text" else {"path": text, "alt_text": "image drawn by the model"}
                    for kind, text in turn.reply.segments
                ]
                shown.append({"role": "assistant", "content": parts or ["*(empty reply)*"]})
            elif index == len(self.turns) - 1 and streaming is not None:
                shown.append({"role": "assistant", "content": streaming + " ▌"})
        return shown
