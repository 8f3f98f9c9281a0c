# Multi-stage build: compile in the Rust image, run from a slim Debian with only libpq and CA certificates.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpq-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
# The SQLite build settings (.cargo/config.toml: a page cache of its own for each connection).
COPY .cargo ./.cargo
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin cpis

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpq5 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/cpis --create-home cpis
COPY --from=build /src/target/release/cpis /usr/local/bin/cpis
COPY config /etc/cpis
ENV CPIS_CONFIG_DIR=/etc/cpis \
    CPIS__SERVER__HOST=0.0.0.0 \
    CPIS__DATABASE__URL=sqlite:///var/lib/cpis/cpis.db \
    CPIS__LOG__FORMAT=json
USER cpis
WORKDIR /var/lib/cpis
VOLUME /var/lib/cpis
EXPOSE 8080
ENTRYPOINT ["cpis"]
CMD ["serve"]
