# tunnel: expose, connect and rendezvous from one small image.
# Build: docker build -t tunnel .      Run: see README.md, section Container.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
# (The benchmark is not built here, but the manifest names it: a stub stays in its place.)
RUN mkdir src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/suite.rs \
 && cargo build --release --locked \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && strip target/release/tunnel

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin tunnel \
 && mkdir -p /data /etc/tunnel \
 && chown tunnel:tunnel /data \
 && printf '# Mount your rules over this file: -v "$PWD/proxy-rules.toml:/etc/tunnel/proxy-rules.toml:ro"\n' \
      > /etc/tunnel/proxy-rules.toml
COPY --from=build /src/target/release/tunnel /usr/local/bin/tunnel
# The identity lives on the volume, so the peer id survives restarts. Flags still win.
ENV TUNNEL_IDENTITY=/data/identity.pem \
    TUNNEL_CONFIG=/etc/tunnel/proxy-rules.toml \
    RUST_LOG=info
USER 10001:10001
WORKDIR /data
VOLUME /data
# 4433/udp: the QUIC endpoint of `expose`; 3478/udp: `rendezvous`; 8554 and 8080: typical
# `connect --local` ports.
EXPOSE 4433/udp 3478/udp 8554/tcp 8080/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["tunnel"]
CMD ["--help"]
