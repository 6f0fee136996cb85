# syntax=docker/dockerfile:1
# iamlet's image: the agent, iptables with both backends (nft and legacy), so it works with
# whichever one kube-proxy uses on the node, and conntrack, to reset pod connections to the
# metadata address made before iamlet's rules.

FROM rust:1.95-slim-bookworm AS build
# make builds jemalloc, the agent's allocator (the slim image has gcc, not make).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin iamlet \
    && strip target/release/iamlet

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="iamlet" \
      org.opencontainers.image.description="Per-node agent that gives Kubernetes pods their own AWS IAM roles through the EC2 metadata address" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Debian's iptables package ships iptables-nft and iptables-legacy (and ip6tables-*, and
# their -restore programs, which install iamlet's rules atomically).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.9-2 conntrack=1:1.4.7-1+b2 ca-certificates=20250419~deb12u2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/iamlet /usr/local/bin/iamlet
# No USER: iptables needs uid 0. The DaemonSet drops every capability but NET_ADMIN and
# NET_RAW, forbids privilege escalation and mounts the root filesystem read-only.
EXPOSE 8181 8182
ENTRYPOINT ["/usr/local/bin/iamlet"]
