"""The Flower ClientApp of dmsc-fed (component ``clients.app:app``).

Flower 1.42 starts a fresh process for every message, so this module stays
light: handlers import torch and the data stack only when they run.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def join(msg: Message, context: Context) -> Message:
    """Tell the server who this site is and what it holds."""
    from clients.site import handle_join

    return Message(content=handle_join(msg.content, dict(context.node_config)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's data."""
    from clients.site import handle_train

    return Message(content=handle_train(msg.content, dict(context.node_config)), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's held-out split."""
    from clients.site import handle_evaluate

    return Message(content=handle_evaluate(msg.content, dict(context.node_config)), reply_to=msg)
