"""kombu's filesystem transport, publishing each message by rename.

The stock channel's ``_put`` creates the message file, then writes it: a worker that polls
in between reads an empty file, fails to decode it and the message is gone (kombu issue
#1551). Under load that lost one task in a few hundred, and the producer waited for it
until its timeout. Here a message is written under a name no worker picks up and renamed
into place whole. (Production brokers, Redis or RabbitMQ, have no such window.)
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from kombu.transport import filesystem
from kombu.utils.json import dumps


class AtomicFilesystemChannel(filesystem.Channel):
    """The filesystem channel; a message file appears whole or not at all."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = Path(self.data_folder_out) / name
        partial = final.with_name(f"{name}.part")  # does not end in ".<queue>.msg"
        partial.write_text(dumps(payload), encoding="utf-8")
        partial.replace(final)


class AtomicFilesystemTransport(filesystem.Transport):
    """The filesystem transport with :class:`AtomicFilesystemChannel`."""

    Channel = AtomicFilesystemChannel
