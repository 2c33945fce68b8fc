"""An in-process Flower ``Grid`` whose sites are the real site handlers.

Each message is answered in this process by :func:`clients.site.handle_join`,
:func:`clients.site.handle_train` or :func:`clients.site.handle_evaluate` with the
node config of its destination node, as a SuperNode running ``clients.app`` would.
Server code under test (:func:`server.join.discover_sites`, :class:`server.rounds.RoundLoop`,
:func:`server.loop.run_federation`) takes it in place of a real Grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message, MessageType

from clients.site import handle_evaluate, handle_join, handle_train
from dmsc_fed.security.provision import provision


def provision_keys(out: Path, sites: Sequence[str]) -> Path:
    """The federation's key material under ``out``, as ``dmsc-fed keys init`` makes it; returns ``out``."""
    return provision(out=out, sites=list(sites))


def site_nodes(
    sites: Sequence[str], *, state_dir: Path, keys: Path | None = None, device: str = "cpu"
) -> dict[int, dict[str, str]]:
    """Node configs by node id (1, 2, ...) for ``sites``; with ``keys``, each site gets its own key material."""
    nodes: dict[int, dict[str, str]] = {}
    for i, name in enumerate(sites, start=1):
        node = {"site-name": name, "state-dir": str(state_dir), "device": device}
        if keys is not None:
            node["keys-dir"] = str(keys / "sites" / name)
        nodes[i] = node
    return nodes


@dataclass
class SiteGrid:
    """A Grid whose sites run in this process; the sites in ``down`` answer the join, then nothing."""

    nodes: dict[int, dict[str, str]]
    down: set[int] = field(default_factory=set)
    train_calls: list[tuple[str, Message, Message]] = field(default_factory=list)  # (site, request, reply)
    sent: list[Message] = field(default_factory=list)  # every message the server sent, in order

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        handlers = {
            MessageType.QUERY: handle_join,
            MessageType.TRAIN: handle_train,
            MessageType.EVALUATE: handle_evaluate,
        }
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            if kind != MessageType.QUERY and node in self.down:
                continue  # the site crashed after joining: no reply by the deadline
            reply = Message(content=handlers[kind](msg.content, self.nodes[node]), reply_to=msg)
            if kind == MessageType.TRAIN:
                self.train_calls.append((self.nodes[node]["site-name"], msg, reply))
            replies.append(reply)
        return replies
