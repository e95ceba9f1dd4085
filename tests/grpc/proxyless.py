"""A second, independent xDS client: gRPC's own (proxyless) xDS support in grpcio.

  proxyless.py server          serve misaki.demo.Echo/Say on 127.0.0.1:<free port>,
                               print the port, run until stdin closes
  proxyless.py client TARGET   call Say through `xds:///TARGET` (GRPC_XDS_BOOTSTRAP
                               names misaki-cp) and print the reply

grpcio is stricter than Envoy in places (weighted localities, an api_listener per
target, a router filter), which is why the end-to-end tests run it.
"""
import sys
from concurrent import futures

import grpc

METHOD = "/misaki.demo.Echo/Say"


def server() -> None:
    def say(request: bytes, context) -> bytes:
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        "misaki.demo.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(say)},
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    print(port, flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    srv.stop(0)


def client(target: str) -> None:
    with grpc.insecure_channel(f"xds:///{target}") as channel:
        say = channel.unary_unary(METHOD)
        reply = say(b"hello from a proxyless client", timeout=20, wait_for_ready=True)
        print(reply.decode(), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"]:
        server()
    elif sys.argv[1:2] == ["client"] and len(sys.argv) == 3:
        client(sys.argv[2])
    else:
        sys.exit(__doc__)
