"""{{name}}: a modelcache exclude policy. Skips documentation: every file
whose path ends in `.md`, at any depth."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.exclude import Request, Skip


class Exclude(exports.Exclude):
    def decide(self, request: Request) -> list[Skip]:
        return [Skip(path=file.path, reason="documentation") for file in request.files if file.path.endswith(".md")]
