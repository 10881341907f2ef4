# The controller image `trellis install` points at (--controller-image; default
# ghcr.io/trellis-mesh/trellis-controller:<version>, a placeholder until images are published).
# Its Deployment runs `trellis controller ...` as a non-root user on a read-only root filesystem.
# Build from the repository root:
#   docker build -f deploy/images/controller.Dockerfile -t trellis-controller:0.1.0 .
# Not built by CI: the build machine has no container runtime (deploy/README.md, "Images").
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p trellis-cli --bin trellis

# The controller needs glibc and the system's TLS roots (AWS Cloud Map, a real API server's
# kubeconfig may rely on them); nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/trellis /usr/local/bin/trellis
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/trellis"]
