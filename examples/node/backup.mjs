// Takes a backup from a safehold server with plain @grpc/grpc-js and the .proto
// file, writes it to a temp name, and renames it only when the trailer's size and
// SHA-256 match what arrived: a client in another language, from the contract alone.
//
//   SAFEHOLD_TARGET=127.0.0.1:50051 SAFEHOLD_PASSWORD=... node examples/node/backup.mjs out.sqlite
import { createHash } from "node:crypto";
import { createWriteStream, renameSync, rmSync } from "node:fs";
import { connect, describe } from "./connect.mjs";

const dest = process.argv[2];
if (!dest) {
  console.error("usage: SAFEHOLD_PASSWORD=... node backup.mjs DEST");
  process.exit(2);
}
const { client, metadata } = connect("node backup.mjs DEST");

const partial = `${dest}.partial`;
const out = createWriteStream(partial, { mode: 0o600 });
const hash = createHash("sha256");
let size = 0;
let manifest = null;
let trailer = null;

function fail(message) {
  out.destroy();
  rmSync(partial, { force: true });
  console.error(`backup failed: ${message}`);
  process.exit(1);
}

const call = client.Backup({}, metadata);
call.on("data", (response) => {
  if (response.frame === "manifest") {
    manifest = response.manifest;
  } else if (response.frame === "chunk") {
    hash.update(response.chunk);
    size += response.chunk.length;
    if (!out.write(response.chunk)) {
      call.pause(); // backpressure: let the file catch up
      out.once("drain", () => call.resume());
    }
  } else if (response.frame === "trailer") {
    trailer = response.trailer;
  }
});
call.on("error", (err) => fail(describe(err)));
call.on("end", () => {
  out.end(() => {
    const digest = hash.digest();
    if (!trailer) return fail("the stream ended without a trailer");
    if (String(size) !== String(trailer.size_bytes) || !digest.equals(trailer.sha256)) {
      return fail("the trailer does not match what arrived");
    }
    renameSync(partial, dest);
    client.close();
    console.log(JSON.stringify({
      path: dest,
      size_bytes: size,
      sha256: digest.toString("hex"),
      engine: manifest.engine,
      database_name: manifest.database_name,
    }));
  });
});
