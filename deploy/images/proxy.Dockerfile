# The proxy image `trellis install` and the injector point at (--proxy-image; default
# ghcr.io/trellis-mesh/trellis-proxy:<version>, a placeholder until images are published). The
# injected init container runs `trellis-init` from this same image, which pipes its rules into
# `iptables-restore` / `ip6tables-restore`: so the image carries Debian's iptables.
# Build from the repository root:
#   docker build -f deploy/images/proxy.Dockerfile -t trellis-proxy:0.1.0 .
# Not built by CI: the build machine has no container runtime (deploy/README.md, "Images").
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p trellis-proxy -p trellis-intercept

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/trellis-proxy /src/target/release/trellis-init /usr/local/bin/
# The injected proxy runs as UID 1337 (the interception rules let this UID's traffic through);
# trellis-init runs as root with NET_ADMIN and NET_RAW only (set by the injector).
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/trellis-proxy"]
