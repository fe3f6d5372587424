"""{{name}}: a modelcache admission policy. Admits mounts from every
namespace but `kube-system`, without the node's registry credentials and
under no tenant; refuses `kube-system`."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.admission import Grant, Request, Verdict, Verdict_Admit, Verdict_Deny


class Admission(exports.Admission):
    def decide(self, request: Request) -> Verdict:
        if request.requester.namespace == "kube-system":
            return Verdict_Deny(
                f"namespace `kube-system` may not mount {request.reference.text}: system pods get no models"
            )
        return Verdict_Admit(Grant(node_credentials=False, tenant=None))
