# syntax=docker/dockerfile:1
# bynder-usage-sync as a container: a multi-stage build, a distroless runtime with no shell, a
# non-root user, the state on a volume, configuration by environment variables or a mounted file.
# Usage: docs/operations.md.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches speed up rebuilds; the binary is copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bynder-usage-sync \
    && install -D -m 0755 target/release/bynder-usage-sync /out/bynder-usage-sync
# The state folder, owned by the runtime user (distroless "nonroot" is 65532).
RUN install -d -m 0750 -o 65532 -g 65532 /out/state

# ---- runtime ----------------------------------------------------------------------------------
# glibc and libgcc only: SQLite is linked in, TLS is rustls with its own root certificates.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bynder-usage-sync /usr/local/bin/bynder-usage-sync
COPY --from=build --chown=65532:65532 /out/state /var/lib/bynder-usage-sync
USER 65532:65532
# state.db lives here (the default database.path); the CMS writes cms_asset_references into it.
VOLUME ["/var/lib/bynder-usage-sync"]
# In a container the endpoints must listen beyond loopback; logs go out as JSON lines.
# Everything else comes from BYNDER_USAGE_SYNC_* variables or a file mounted at
# /etc/bynder-usage-sync/config.toml (or named by BYNDER_USAGE_SYNC_CONFIG).
ENV BYNDER_USAGE_SYNC_SERVER__LISTEN=0.0.0.0:9464 \
    BYNDER_USAGE_SYNC_LOG__FORMAT=json
EXPOSE 9464
STOPSIGNAL SIGTERM
# The binary asks its own /healthz: no curl or shell needed.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/bynder-usage-sync", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/bynder-usage-sync"]
CMD ["run"]
