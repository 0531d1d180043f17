"""How a question becomes the prompt a model sees: an optional instruction, then the tokenizer's chat template
when it has one (instruct models answer far better inside their own template than after raw text)."""

from __future__ import annotations


def render_prompt(tokenizer, question: str, instruction: str = "", chat_template: str = "auto") -> str:
    """The prompt text for ``question``.

    ``chat_template="auto"`` with a tokenizer that has one: a system message (``instruction``, when set) and a
    user message (the question), ending with the assistant's generation prompt. Otherwise the instruction, a
    blank line and the question as plain text (the question itself when there is no instruction)."""
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": instruction}] if instruction else []) + [
            {"role": "user", "content": question.strip()}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{instruction}\n\n{question}" if instruction else question
