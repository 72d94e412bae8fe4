"""Drives the bandit through Kafka, as in the talk: rewards one arm, then sends feature
vectors to the topic "features" and reads the model's predictions from the topic
"predictions". Usage: python client.py [BOOTSTRAP (127.0.0.1:9092)] [BEST_ARM (2)] [MODEL_ID (m1)]

Exits 0 once every prediction arrived (non-zero after 60 s without them).
"""
import sys
import time

from google.protobuf.struct_pb2 import Struct
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

BOOTSTRAP = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
BEST = int(sys.argv[2]) if len(sys.argv) > 2 else 2
MODEL = sys.argv[3] if len(sys.argv) > 3 else "m1"
REQUESTS = 20

# One request in flight: a retried send cannot overtake a later one (feedback comes first).
producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", max_in_flight_requests_per_connection=1)


def send(fields):
    s = Struct()
    s.update(fields)
    # The record key is the id of the target function instance (demo/model/<key>).
    producer.send("features", key=MODEL.encode(), value=s.SerializeToString())


for _ in range(20):
    for arm in range(4):
        send({"arm": arm, "reward": 1.0 if arm == BEST else 0.0})
requests = [f"{MODEL}-request-{i}-{time.time_ns()}" for i in range(REQUESTS)]
for r in requests:
    send({"request": r, "features": [0.5, 1.5, 2.5]})
producer.flush()

consumer = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, consumer_timeout_ms=1000)
parts = [TopicPartition("predictions", p) for p in consumer.partitions_for_topic("predictions") or {0}]
consumer.assign(parts)
consumer.seek_to_beginning(*parts)
picks = {}
deadline = time.time() + 60
while len(picks) < REQUESTS and time.time() < deadline:
    for record in consumer:
        p = Struct.FromString(record.value)
        if p["request"] in requests:
            picks[p["request"]] = int(p["arm"])
picks = [picks[r] for r in requests if r in picks]
print("predictions:", picks)
print("best arm chosen", picks.count(BEST), "of", len(picks), "times")
sys.exit(0 if len(picks) == REQUESTS else 1)
