// The server's own repository (`safehold serve --repository ...`) from the .proto alone:
//
//   node examples/node/repository.mjs list [PAGE_SIZE]   every backup, newest first, page by page
//   node examples/node/repository.mjs backup-now         the server takes one now; prints its entry
//
// Prints JSON on stdout; on failure, one line on stderr with the gRPC status, exit 1.
import { connect, describe } from "./connect.mjs";

const usage = "node repository.mjs list [PAGE_SIZE] | backup-now";
const [verb, pageSize] = process.argv.slice(2);
const { client, metadata } = connect(usage);

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function entry(backup) {
  return {
    name: backup.name,
    database_name: backup.database_name,
    engine: backup.engine,
    created_at: new Date(Number(backup.created_at.seconds) * 1000).toISOString(),
    size_bytes: Number(backup.artefact.size_bytes),
    sha256: backup.artefact.sha256.toString("hex"),
    encryption: backup.encryption,
  };
}

async function main() {
  if (verb === "list") {
    const backups = [];
    let pages = 0;
    let page_token = "";
    do {
      const reply = await call("ListRepositoryBackups", {
        page_size: Number(pageSize ?? 0),
        page_token,
      });
      backups.push(...reply.backups.map(entry));
      page_token = reply.next_page_token;
      pages += 1;
    } while (page_token);
    return { pages, backups };
  }
  if (verb === "backup-now") {
    const reply = await call("CreateRepositoryBackup", {});
    return { backup: entry(reply.backup), backups_in_repository: reply.backups_in_repository };
  }
  console.error(`usage: ${usage}`);
  process.exit(2);
}

main().then(
  (result) => {
    console.log(JSON.stringify(result));
    client.close();
  },
  (err) => {
    console.error(`${verb} failed: ${describe(err)}`);
    process.exit(1);
  },
);
