"""Drives the bandit through statemesh's HTTP ingress: rewards one arm, then asks for
predictions. Usage: python client.py [http://127.0.0.1:8090] [BEST_ARM]"""
import sys
import urllib.request

from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8090"
BEST = int(sys.argv[2]) if len(sys.argv) > 2 else 2


def post(verb, message):
    typename = "type.googleapis.com/" + message.DESCRIPTOR.full_name
    req = urllib.request.Request(f"{BASE}/v1/{verb}/demo/model/m1", data=message.SerializeToString(), method="POST",
                                 headers={"Content-Type": "application/vnd." + typename})
    with urllib.request.urlopen(req) as resp:
        return resp.read()


for round in range(20):
    for arm in range(4):
        feedback = Struct()
        feedback.update({"arm": arm, "reward": 1.0 if arm == BEST else 0.0})
        post("send", feedback)

picks = [Int64Value.FromString(post("call", StringValue(value=f"request-{i}"))).value for i in range(20)]
print("predictions:", picks)
print("best arm chosen", picks.count(BEST), "of", len(picks), "times")
