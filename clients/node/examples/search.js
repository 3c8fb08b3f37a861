#!/usr/bin/env node
'use strict';
// Search a loupe cluster with an image file and print the ranking.
//   node examples/search.js 127.0.0.1:50051 query.jpg [k] [--verify]
// Token: env LOUPE_TOKEN or LOUPE_TOKEN_FILE (never on the command line); TLS: env LOUPE_TLS_CA_FILE.
const { LoupeClient, tokenFromEnv, status } = require('@loupe/client');

async function main() {
  const args = process.argv.slice(2);
  const verify = args.includes('--verify');
  const [address, image, k] = args.filter((a) => a !== '--verify');
  if (!address || !image) {
    console.error('usage: node examples/search.js HOST:PORT IMAGE [K] [--verify]');
    process.exit(2);
  }
  const client = new LoupeClient(address, { token: tokenFromEnv(), caFile: process.env.LOUPE_TLS_CA_FILE || undefined });
  try {
    const resp = await client.searchFile(image, { k: Number(k || 10), rerank: verify ? { verify: { enabled: true } } : undefined });
    console.log('rank  score     inliers  verified  shard  id');
    resp.results.forEach((r, i) => {
      console.log(`${String(i + 1).padStart(4)}  ${r.score.toFixed(4).padStart(8)}  ${String(r.stages ? r.stages.inliers : 0).padStart(7)}  ` +
        `${String(r.verified).padEnd(8)}  ${String(r.shard_id).padStart(5)}  ${r.id}`);
    });
    if (resp.partial) console.log(`partial: shards ${resp.missing_shards.join(', ')} did not answer`);
    console.log('timings (ms): ' + resp.timings.map((t) => `${t.stage}=${(t.seconds * 1000).toFixed(1)}`).join(', '));
  } catch (err) {
    console.error(`search failed: ${err.code !== undefined ? status[err.code] : ''} ${err.details || err.message}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
