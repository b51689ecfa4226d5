# safehold next to a database: the same install steps as README.md.
FROM python:3.11-slim-bookworm

# Client tools of every PostgreSQL major GameVault runs on, each the newest minor,
# from the PostgreSQL project's own apt repository (bookworm's client is 15 only, and a
# pg_dump refuses a newer server). safehold picks, for the server it guards, the tools
# of its major from /usr/lib/postgresql/*/bin (`safehold info` names them).
ADD --chmod=644 https://www.postgresql.org/media/keys/ACCC4CF8.asc /etc/apt/keyrings/pgdg.asc
RUN echo "deb [signed-by=/etc/apt/keyrings/pgdg.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
        > /etc/apt/sources.list.d/pgdg.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        postgresql-client-15=15.* postgresql-client-16=16.* \
        postgresql-client-17=17.* postgresql-client-18=18.* \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 safehold \
    && useradd --system --create-home --home-dir /home/safehold --uid 10001 --gid 10001 safehold \
    && mkdir -p /data \
    && chown 10001:10001 /data

WORKDIR /opt/safehold
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY client ./client
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir .

# Health checks also answer in plaintext on the container's own loopback, so
# that the HEALTHCHECK works when TLS or mutual TLS is on (BackupService calls
# there are refused when TLS is configured).
ENV PATH="/opt/venv/bin:${PATH}" \
    SAFEHOLD_DATA_DIR=/data \
    SAFEHOLD_LISTEN=0.0.0.0:50051 \
    SAFEHOLD_HEALTH_LISTEN=127.0.0.1:50052
USER 10001:10001
VOLUME ["/data"]
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["safehold", "health", "--target", "127.0.0.1:50052", "--connect-timeout", "5"]
ENTRYPOINT ["safehold"]
CMD ["serve"]
