// TypeScript version of search.js: search a loupe cluster with an image file, print the ranking.
// Type-checked by `npm run typecheck` (tsc --noEmit); to run it, compile it (tsc) or use a TS runner:
//   LOUPE_TOKEN_FILE=read-token LOUPE_TLS_CA_FILE=ca.crt node search.js 127.0.0.1:50051 query.jpg 5 --verify
// Token: env LOUPE_TOKEN or LOUPE_TOKEN_FILE (never on the command line); TLS: env LOUPE_TLS_CA_FILE.
import { LoupeClient, tokenFromEnv, status, type LoupeError, type SearchResponse, type SearchOptions } from '@loupe/client';

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const verify = args.includes('--verify');
  const [address, image, k] = args.filter((a) => a !== '--verify');
  if (!address || !image) {
    console.error('usage: node search.js HOST:PORT IMAGE [K] [--verify]');
    process.exit(2);
  }
  const client = new LoupeClient(address, { token: tokenFromEnv(), caFile: process.env.LOUPE_TLS_CA_FILE || undefined, deadlineMs: 10000 });
  const opts: Omit<SearchOptions, 'image' | 'vector'> = { k: Number(k || 10), rerank: verify ? { verify: { enabled: true } } : undefined };
  try {
    const resp: SearchResponse = await client.searchFile(image, opts);
    console.log('rank  score     inliers  verified  shard  id');
    resp.results.forEach((r, i) => {
      console.log(`${String(i + 1).padStart(4)}  ${r.score.toFixed(4).padStart(8)}  ${String(r.stages ? r.stages.inliers : 0).padStart(7)}  ` +
        `${String(r.verified).padEnd(8)}  ${String(r.shard_id).padStart(5)}  ${r.id}`);
    });
    if (resp.partial) console.log(`partial: shards ${resp.missing_shards.join(', ')} did not answer`);
    console.log('timings (ms): ' + resp.timings.map((t) => `${t.stage}=${(t.seconds * 1000).toFixed(1)}`).join(', '));
  } catch (e) {
    const err = e as LoupeError;
    console.error(`search failed: ${err.code !== undefined ? status[err.code] : ''} ${err.details || err.message}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
