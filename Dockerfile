# syntax=docker/dockerfile:1
# iamlet's image: the agent, iptables with both backends (nft and legacy), so it works with
# whichever one kube-proxy uses on the node, and conntrack, to reset pod connections to the
# metadata address made before iamlet's rules.
#
#   docker build -t iamlet .        compiles iamlet in the build stage (release, fat LTO)
#   docker build --build-arg BINARY=prebuilt -t iamlet DIR
#                                   takes DIR/iamlet, already built for glibc 2.36 or older
#                                   (scripts/image.sh does this with the tests' build)

ARG BINARY=build

FROM rust:1.95-slim-bookworm AS build
# make builds jemalloc, the agent's allocator (the slim image has gcc, not make).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The workspace, not only the agent's sources: cargo reads every member and every declared
# target (the test kit, the benchmarks, the demo's fake API server) even to build one binary.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY testkit ./testkit
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin iamlet \
    && install -D -m 0755 target/release/iamlet /out/iamlet

FROM scratch AS prebuilt
COPY iamlet /out/iamlet

# The binary: compiled above, or given.
FROM ${BINARY} AS binary

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="iamlet" \
      org.opencontainers.image.description="Per-node agent that gives Kubernetes pods their own AWS IAM roles through the EC2 metadata address" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Debian's iptables package ships iptables-nft and iptables-legacy (and ip6tables-*, and
# their -restore programs, which install iamlet's rules atomically); nftables' `nft` installs
# the pod port binding (the bridge family and sets, which iptables cannot express).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.9-2 nftables=1.0.6-2+deb12u2 conntrack=1:1.4.7-1+b2 ca-certificates=20250419~deb12u2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=binary /out/iamlet /usr/local/bin/iamlet
# No USER: iptables needs uid 0. The DaemonSet drops every capability but NET_ADMIN and
# NET_RAW, forbids privilege escalation and mounts the root filesystem read-only.
EXPOSE 8181 8182
ENTRYPOINT ["/usr/local/bin/iamlet"]
