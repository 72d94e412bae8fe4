# The statemesh node image: `docker build -t statemesh .` at the repository's root (BuildKit,
# the default builder since Docker 23, for `RUN --mount`; no `# syntax=` line, so the build
# needs no frontend image from Docker Hub).
# Build stage: the release binary (protobuf compiles with protox, librdkafka is vendored:
# nothing beyond the Rust image is needed).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Without debug info and symbols: a 33 MB binary instead of 208 MB.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked -p statemesh-node \
    && cp target/release/statemesh /usr/local/bin/statemesh

# Runtime stage: Debian slim (glibc, as the binary was built against), a non-root user, and
# the CA roots that HTTPS to S3 and to https:// function endpoints needs (slim has none: the
# node would refuse an s3:// checkpoint URL). Unpinned so that rebuilds take Debian's updates.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 statemesh \
    && useradd --system --uid 10001 --gid statemesh --home-dir /var/lib/statemesh statemesh \
    && mkdir -p /var/lib/statemesh /etc/statemesh \
    && chown statemesh:statemesh /var/lib/statemesh
COPY --from=build /usr/local/bin/statemesh /usr/local/bin/statemesh
COPY ops/container.toml /etc/statemesh/node.toml
USER 10001:10001
WORKDIR /var/lib/statemesh
VOLUME ["/var/lib/statemesh"]
# gRPC ingress and node-to-node transport; HTTP ingress, admin, metrics.
EXPOSE 5090 8090
# Live while the process serves HTTP; `statemesh health --ready` checks /readyz instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["statemesh", "health", "--http", "http://127.0.0.1:8090"]
ENTRYPOINT ["statemesh"]
CMD ["node", "--config", "/etc/statemesh/node.toml"]
