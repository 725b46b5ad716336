// ES module entry of the browser client: the implementation is the classic script beside this
// file (which also works from a plain <script> tag); importing it for its side effect defines it once.
import './bali-zero-stream-client.js';

export const {
  BaliZeroStreamClient,
  EventStreamParser,
  StreamError,
  parseEventStream,
  backoffDelay,
  makeTraceparent,
} = globalThis.BaliZeroSSE;
export default BaliZeroStreamClient;
