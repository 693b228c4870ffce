// The load benchmark's peer (issue 6, 2c): oidc-provider issuing JWT access tokens by
// `client_credentials` with a resource indicator, signed with EdDSA (Ed25519), in a node
// cluster of WORKERS processes sharing one listening socket and one signing key.
//
//   PORT=18082 WORKERS=2 node server.mjs        (bench/load copies this next to node_modules)
//
// Request (what bench/load sends):
//   POST /token  grant_type=client_credentials&client_id=bench&client_secret=...&scope=api:read
//                &resource=https://api.example.com
import cluster from 'node:cluster';
import { generateKeyPair, exportJWK } from 'jose';

const PORT = Number(process.env.PORT || 18082);
const WORKERS = Number(process.env.WORKERS || 2);
const ISSUER = `http://127.0.0.1:${PORT}`;
const RESOURCE = 'https://api.example.com';

if (cluster.isPrimary) {
  const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
  const jwk = { ...(await exportJWK(privateKey)), alg: 'EdDSA', use: 'sig', kid: 'bench-ed25519' };
  let up = 0;
  for (let i = 0; i < WORKERS; i += 1) {
    const w = cluster.fork({ PEER_JWK: JSON.stringify(jwk) });
    w.on('message', (m) => {
      if (m === 'up' && ++up === WORKERS) console.log(`listening on ${ISSUER} (${WORKERS} workers)`);
    });
  }
  cluster.on('exit', (w, code) => console.error(`worker ${w.process.pid} exited ${code}`));
  const stop = () => { for (const w of Object.values(cluster.workers)) w.kill(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const { default: Provider } = await import('oidc-provider');
  const jwk = JSON.parse(process.env.PEER_JWK);
  const provider = new Provider(ISSUER, {
    clients: [{
      client_id: 'bench',
      client_secret: 'bench-secret-bench-secret-bench-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_post',
      id_token_signed_response_alg: 'EdDSA',
      scope: 'api:read',
    }],
    jwks: { keys: [jwk] },
    scopes: ['api:read'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => {
          if (resource !== RESOURCE) throw new Error('unknown resource');
          return {
            scope: 'api:read',
            audience: RESOURCE,
            accessTokenTTL: 300,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'EdDSA' } },
          };
        },
      },
    },
  });
  provider.listen(PORT, '127.0.0.1', () => process.send('up'));
}
