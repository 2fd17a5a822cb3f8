"""DeepSpeed-Chat's text template, in one place: the data adapters, the built-in task, chat and serve all use it.

A single-turn prompt is ``" Human: " + question + " Assistant:"`` and the answer follows with a leading space;
a conversation is those rounds one after another.
"""

HUMAN = " Human: "
ASSISTANT = " Assistant:"
HUMAN_MARKER = "Human:"  # where a reply that goes on into an invented next turn is cut


def format_prompt(question: str) -> str:
    """The single-turn prompt for ``question``."""
    return HUMAN + question + ASSISTANT
