# bynder-usage-sync as a container: a distroless runtime with no shell, a non-root user, the state
# on a volume, configuration by environment variables or a mounted file. Two ways to the same
# runtime image (usage: docs/operations.md):
#   docker build -t bynder-usage-sync .
#       the default, last stage `runtime`: compiles in rust:slim (needs BuildKit, for the cache
#       mounts of the build stage);
#   scripts/build-image-from-host [TAG]
#       the stage `runtime-from-host`: takes a release binary built on the host from a small
#       context the script prepares (no compiler in Docker, works with the legacy builder).
# The host stage comes before the build stage on purpose: the legacy builder runs every stage up
# to the --target, and this way it never reaches the one that needs BuildKit.

# ---- what both runtime stages share ------------------------------------------------------------
# glibc and libgcc only: SQLite is linked in, TLS is rustls with its own root certificates.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-base
USER 65532:65532
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

# ---- runtime from a binary built on the host ---------------------------------------------------
# The context (made by scripts/build-image-from-host): bynder-usage-sync, the release binary, and
# var-lib/bynder-usage-sync/, the state folder with mode 0750. A folder keeps its mode only when
# it is copied as an entry of its parent (copying a folder itself copies its contents into a new
# 0755 folder), and the legacy builder has no COPY --chmod.
FROM runtime-base AS runtime-from-host
COPY bynder-usage-sync /usr/local/bin/bynder-usage-sync
COPY --chown=65532:65532 var-lib/ /var/lib/
# state.db lives here (the default database.path); the CMS writes cms_asset_references into it.
# A new named volume takes the folder's owner and mode.
VOLUME ["/var/lib/bynder-usage-sync"]

# ---- build --------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches speed up rebuilds; the binary is copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bynder-usage-sync \
    && install -D -m 0755 target/release/bynder-usage-sync /out/bynder-usage-sync
# The state folder, owned by the runtime user (distroless "nonroot" is 65532), laid out as in the
# host stage's context so that its mode survives the copy.
RUN install -d -m 0750 -o 65532 -g 65532 /out/var-lib/bynder-usage-sync

# ---- runtime (the default target) ---------------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=build /out/bynder-usage-sync /usr/local/bin/bynder-usage-sync
COPY --from=build --chown=65532:65532 /out/var-lib/ /var/lib/
# state.db lives here (the default database.path); the CMS writes cms_asset_references into it.
# A new named volume takes the folder's owner and mode.
VOLUME ["/var/lib/bynder-usage-sync"]
