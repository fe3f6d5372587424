"""{{name}}: a modelcache gc policy. Evicts every entry unused for more than
a week, longest idle first."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.gc import Request

WEEK = 7 * 24 * 60 * 60


class Gc(exports.Gc):
    def decide(self, request: Request) -> list[str]:
        idle = [c for c in request.candidates if request.now - c.last_used_at > WEEK]
        idle.sort(key=lambda c: c.last_used_at)
        return [c.key for c in idle]
