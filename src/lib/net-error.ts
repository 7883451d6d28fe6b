/**
 * A network failure in words an operator can act on: the host that was being reached and
 * the cause (`auth.openai.com: ENOTFOUND (DNS lookup failed: …)`). undici wraps the socket's
 * error, so the code is looked for along the `cause` chain. Never includes a URL's path or
 * query, where a token could sit.
 */
export function describeNetworkError(err: unknown, url: string, timedOut = false): string {
  const host = hostOf(url);
  if (timedOut) return `${host}: timeout (no answer in time; check the network path and any HTTPS_PROXY)`;
  const code = codeOf(err);
  return `${host}: ${code}${hintFor(code) ? ` (${hintFor(code)})` : ''}`;
}

function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return 'the upstream';
  }
}

function codeOf(err: unknown): string {
  let e: unknown = err;
  let fallback: string | undefined;
  for (let depth = 0; depth < 5 && e instanceof Error; depth++) {
    const code = (e as NodeJS.ErrnoException).code;
    // undici's own codes (UND_ERR_*) wrap the socket's; prefer the innermost system code.
    if (typeof code === 'string' && !code.startsWith('UND_ERR')) return code;
    if (/proxy/i.test(e.message)) return 'proxy refused the tunnel';
    fallback ??= typeof code === 'string' ? code : e.name;
    e = (e as Error & { cause?: unknown }).cause;
  }
  return fallback ?? 'network error';
}

function hintFor(code: string): string | undefined {
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return 'DNS lookup failed: check the host name, DNS, or set HTTPS_PROXY if the network requires a proxy';
  if (code === 'ECONNREFUSED') return 'nothing accepted the connection: check the URL and port, or the proxy';
  if (code === 'ECONNRESET' || code === 'UND_ERR_SOCKET') return 'the connection was cut: a proxy or firewall may be interfering';
  if (code === 'ETIMEDOUT' || code === 'UND_ERR_CONNECT_TIMEOUT') return 'the connection timed out: check the network path and any HTTPS_PROXY';
  if (code === 'proxy refused the tunnel') return 'check HTTPS_PROXY / HTTP_PROXY and NO_PROXY';
  if (/CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO_VERIFY|EPROTO/i.test(code)) {
    return 'TLS failed: check the host name, and for a TLS-inspecting proxy give Node its CA with NODE_EXTRA_CA_CERTS';
  }
  return undefined;
}
