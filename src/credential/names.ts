/** The login every deployment has: stored under CODEX_AUTH_SECRET_KEY, exactly where the platform keeps it. */
export const DEFAULT_CREDENTIAL = 'default';

/** A credential's name: what operators type and what metrics carry as the `credential` label. */
export const CREDENTIAL_NAME = /^[a-z0-9][a-z0-9-]{0,39}$/;

export function isCredentialName(name: unknown): name is string {
  return typeof name === 'string' && CREDENTIAL_NAME.test(name);
}

/** What a command says of the first `--credential`/`--pool` value that is not a valid name; undefined when all are. */
export function badNameFlag(command: string, flags: Array<readonly [string, string | undefined]>): string | undefined {
  const bad = flags.find(([, value]) => value !== undefined && !isCredentialName(value));
  return bad && `${command}: ${bad[0]} ${JSON.stringify(bad[1])} is not a valid name: lower-case letters, digits and -, at most 40 characters. Nothing was stored.`;
}

/**
 * Where a credential lives in global_secrets: `default` under the configured key (so a
 * platform database keeps working untouched), another name `n` under `<key>__<N>` with `n`
 * upper-cased and `-` as `_` (names hold no `_`, so two names never share a key).
 */
export function secretKeyOf(name: string, defaultKey: string): string {
  return name === DEFAULT_CREDENTIAL ? defaultKey : `${defaultKey}__${name.toUpperCase().replaceAll('-', '_')}`;
}
