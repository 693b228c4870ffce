# syntax=docker/dockerfile:1
# Deputy: a fully static `deputy` binary (x86_64-unknown-linux-musl) on distroless/static.
#
#   docker build -t ghcr.io/deputy-dev/deputy:0.1.0 .
#
# aws-lc-rs (the crypto provider of jsonwebtoken and rustls) compiles C and assembly through
# aws-lc-sys: for the musl target that needs musl-tools (musl-gcc) and cmake; clang is not
# needed. --locked builds exactly Cargo.lock.

# `1` is the newest stable 1.x; pin e.g. 1.91 for reproducible builds (>= 1.89, the MSRV).
ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGET=x86_64-unknown-linux-musl
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools cmake \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "${TARGET}"
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them: the manifests of the
# workspace (the root crate and testapi) with stub sources.
COPY Cargo.toml Cargo.lock ./
COPY testapi/Cargo.toml testapi/Cargo.toml
RUN mkdir -p src testapi/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > testapi/src/main.rs && touch testapi/src/lib.rs \
 && cargo build --release --locked --target "${TARGET}" --bin deputy \
 && rm -rf src testapi/src
COPY src src
COPY testapi testapi
# Touch the sources so cargo rebuilds them over the stubs.
RUN find src testapi/src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --target "${TARGET}" --bin deputy \
 && cp "target/${TARGET}/release/deputy" /deputy \
 && /deputy --help >/dev/null

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="deputy" \
      org.opencontainers.image.description="Short-lived, delegated identities for AI-agent runs on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /deputy /deputy
USER 65532:65532
# 8443: token endpoint; 9090: /livez, /readyz, /metrics.
EXPOSE 8443 9090
ENTRYPOINT ["/deputy"]
CMD ["run"]
