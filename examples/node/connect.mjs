// The BackupService client every example uses: loaded from the .proto alone, with the
// password in the x-database-password metadata and the target from SAFEHOLD_TARGET.
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const definition = protoLoader.loadSync("safehold/v1/backup_service.proto", {
  includeDirs: [path.join(here, "..", "..", "protos")],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { safehold } = grpc.loadPackageDefinition(definition);

export { grpc };

export function connect(usage) {
  const password = process.env.SAFEHOLD_PASSWORD;
  if (!password) {
    console.error(`usage: SAFEHOLD_PASSWORD=... ${usage}`);
    process.exit(2);
  }
  const target = process.env.SAFEHOLD_TARGET ?? "127.0.0.1:50051";
  const client = new safehold.v1.BackupService(target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set("x-database-password", password);
  return { client, metadata };
}

export function describe(err) {
  return `${err.details} (${grpc.status[err.code]})`;
}
