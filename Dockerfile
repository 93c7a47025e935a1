# syntax=docker/dockerfile:1
# The gateway's image: a cached dependency layer, the release build (`cargo build --release --locked`, the
# command CI's build uses in release mode), and a minimal non-root runtime (distroless cc: glibc and libgcc,
# no shell, no package manager). The Helm chart in helm/eventhub-gateway runs it.
#
#   docker build -t eventhub-gateway:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#   docker run --rm -p 50051:50051 -p 9464:9464 eventhub-gateway:0.1.0     # serves against its embedded emulator

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies only: this layer is rebuilt when the manifests, the build script or the protos change, not the
# sources. Placeholders stand in for the library and the binary.
COPY Cargo.toml Cargo.lock build.rs ./
COPY crates/wire/Cargo.toml crates/wire/
COPY crates/telemetry/Cargo.toml crates/telemetry/
COPY crates/emulator/Cargo.toml crates/emulator/
COPY crates/producer/Cargo.toml crates/producer/
COPY crates/bench/Cargo.toml crates/bench/
COPY proto ./proto
# A layer of the dependencies alone: every workspace member stubbed, so a source change rebuilds only our crates.
RUN mkdir -p src crates/bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for crate in wire telemetry emulator producer; do mkdir -p crates/$crate/src && touch crates/$crate/src/lib.rs; done \
    && echo 'fn main() {}' > crates/bench/src/main.rs \
    && cargo build --release --locked --bin eventhub-gateway \
    && rm -rf src crates/*/src
COPY src ./src
COPY crates ./crates
RUN find src crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin eventhub-gateway \
    && mkdir -p /out \
    && objcopy --only-keep-debug target/release/eventhub-gateway /out/eventhub-gateway.debug \
    && objcopy --strip-all --add-gnu-debuglink=/out/eventhub-gateway.debug \
        target/release/eventhub-gateway /out/eventhub-gateway

# The split debug info, on its own: docker build --target debug-symbols --output type=local,dest=symbols .
FROM scratch AS debug-symbols
COPY --from=build /out/eventhub-gateway.debug /eventhub-gateway.debug

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="eventhub-gateway" \
      org.opencontainers.image.description="gRPC gateway that publishes events to Azure Event Hubs, with an embedded Event Hubs emulator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/eventhub-gateway /usr/local/bin/eventhub-gateway
# distroless's nonroot user; the chart runs the pods as the same ids.
USER 65532:65532
# gRPC, then /metrics, /healthz and /readyz.
EXPOSE 50051 9464
# SIGTERM drains: health NOT_SERVING, open calls and streams finish, the producer flushes, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/eventhub-gateway"]
CMD ["serve", "--emulator", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]
