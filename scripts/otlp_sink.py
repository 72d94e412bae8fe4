"""An OTLP/gRPC trace sink for benchmarks: accepts span exports on 127.0.0.1:PORT and counts
the spans (printed at exit). Needs grpcio and opentelemetry-proto (scripts/bench-tracing.sh
installs them in a venv under target/py).

    python otlp_sink.py PORT
"""
import signal
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

spans = 0


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        global spans
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                spans += len(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
print("listening", flush=True)


def stop(*_):
    print(f"spans {spans}", flush=True)
    server.stop(0)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
server.wait_for_termination()
